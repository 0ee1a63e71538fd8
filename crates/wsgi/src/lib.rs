//! The WSGI bridge (PEP 3333): environ, `wsgi.input`, `start_response` and the response.
//!
//! `environ` and `input` turn a mongrel2 request into what the app reads; `call` runs the
//! app; `response` frames what it returns as HTTP in mongrel2 replies; `loader` starts
//! Python and finds the app; `types` holds `wsgi.errors` and `wsgi.file_wrapper`.

pub mod call;
pub mod environ;
pub mod input;
pub mod loader;
pub mod response;
pub mod types;
