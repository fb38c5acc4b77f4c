//! Running a plan: buffer checks before machine code, work split across threads.
