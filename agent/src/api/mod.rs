//! What the agent serves on its Unix socket: the control API (services
//! learn their targets; callers identified by peer credentials).

pub mod control;
pub mod validate;
