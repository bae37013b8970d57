//! pod api
