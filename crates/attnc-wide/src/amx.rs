//! bf16 and int8 attention products on AMX tiles (being built).
