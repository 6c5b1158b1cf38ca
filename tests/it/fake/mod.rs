//! In-process fakes of the Microsoft services postern talks to.

pub mod entra;
pub mod exchange;
pub mod graph;
pub mod graph_upload;
