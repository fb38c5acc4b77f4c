//! Fused elementwise chains with broadcasting, masks, relpos and fills.
