//! In-process fakes of Microsoft services.

pub mod entra;
