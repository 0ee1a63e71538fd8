//! Calling the app: `start_response`, `write`, iterating the result, always `close()`.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::response::{ResponseWriter, StartError};

type SharedWriter = Rc<RefCell<ResponseWriter>>;

/// A PEP 3333 native string as its latin-1 bytes; anything else is the app's error.
fn latin1_bytes(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let text = value
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be str, not {}", type_name(value))))?
        .to_cow()?;
    // Nearly always ASCII, where the UTF-8 bytes are the latin-1 ones.
    if text.is_ascii() {
        return Ok(text.into_owned().into_bytes());
    }
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| PyValueError::new_err(format!("{what} {text:?} is not latin-1")))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

fn io_to_py(e: io::Error) -> PyErr {
    PyRuntimeError::new_err(format!("sending the response failed: {e}"))
}

#[pyclass(module = "wsgid", unsendable)]
pub struct StartResponse {
    writer: SharedWriter,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Write>> {
        let exc_info =
            exc_info.filter(|e| !e.is_none() && !e.get_item(1).is_ok_and(|v| v.is_none()));
        let status = latin1_bytes(status, "status")?;
        let mut list = Vec::new();
        for item in headers.try_iter()? {
            let item = item?;
            let pair = item
                .cast::<PyTuple>()
                .ok()
                .filter(|t| t.len() == 2)
                .ok_or_else(|| PyTypeError::new_err("each header must be a (name, value) tuple"))?;
            list.push((
                latin1_bytes(&pair.get_item(0)?, "header name")?,
                latin1_bytes(&pair.get_item(1)?, "header value")?,
            ));
        }
        match self
            .writer
            .borrow_mut()
            .start(status, list, exc_info.is_some())
        {
            Ok(()) => {}
            Err(StartError::HeadersSent) => {
                let exc = exc_info
                    .expect("HeadersSent only with exc_info")
                    .get_item(1)?;
                return Err(PyErr::from_value(exc));
            }
            Err(StartError::AlreadyStarted) => {
                return Err(PyRuntimeError::new_err(
                    "start_response called a second time without exc_info",
                ))
            }
            Err(StartError::Invalid(msg)) => return Err(PyValueError::new_err(msg)),
        }
        Py::new(
            py,
            Write {
                writer: self.writer.clone(),
            },
        )
    }
}

/// The `write()` callable returned by `start_response`: sends at once.
#[pyclass(module = "wsgid", unsendable)]
pub struct Write {
    writer: SharedWriter,
}

#[pymethods]
impl Write {
    fn __call__(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = body_bytes(data)?;
        self.writer
            .borrow_mut()
            .write(bytes.as_bytes())
            .map_err(io_to_py)
    }
}

/// A body item as bytes. PEP 3333 asks for `bytes`; `bytearray` and `memoryview` are
/// accepted too, as gunicorn accepts them (httpbin's `/bytes` yields a bytearray).
fn body_bytes<'py>(chunk: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    use pyo3::types::{PyByteArray, PyMemoryView};
    if let Ok(bytes) = chunk.cast::<PyBytes>() {
        return Ok(bytes.clone());
    }
    if chunk.is_instance_of::<PyByteArray>() || chunk.is_instance_of::<PyMemoryView>() {
        let py = chunk.py();
        return Ok(py
            .get_type::<PyBytes>()
            .call1((chunk,))?
            .cast_into::<PyBytes>()?);
    }
    Err(PyTypeError::new_err(format!(
        "response body items must be bytes, not {}",
        type_name(chunk)
    )))
}

/// Why a response went wrong: the app (logged, the client gets a 500 or a closed
/// connection) or the socket (the worker cannot go on).
pub enum Failure {
    App(PyErr),
    Io(io::Error),
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::App(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// A whole body up to this size, given as a list, goes out in one message.
const COALESCE_LIMIT: usize = 256 * 1024;

/// Calls the app and sends its response. App errors are logged here and answered; only a
/// failure to send is returned.
pub fn run_app(
    py: Python<'_>,
    app: &Bound<'_, PyAny>,
    environ: Bound<'_, PyDict>,
    writer: &SharedWriter,
) -> io::Result<()> {
    let start_response = Py::new(
        py,
        StartResponse {
            writer: writer.clone(),
        },
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let outcome = match app.call1((environ, start_response)) {
        Err(e) => Err(Failure::App(e)),
        Ok(result) => {
            let sent = send_result(&result, writer);
            let closed = close_result(&result);
            sent.and(closed.map_err(Failure::App))
        }
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(Failure::Io(e)) => Err(e),
        Err(Failure::App(e)) => {
            tracing::error!("application error: {}", format_exception(py, &e));
            writer.borrow_mut().abort()
        }
    }
}

/// PEP 3333: the server calls `close()` on the result whatever happened. A plain list or
/// tuple has none; asking would build and discard an AttributeError on every request.
fn close_result(result: &Bound<'_, PyAny>) -> PyResult<()> {
    if result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>() {
        return Ok(());
    }
    if let Some(close) = result.getattr_opt(pyo3::intern!(result.py(), "close"))? {
        close.call0()?;
    }
    Ok(())
}

fn send_result(result: &Bound<'_, PyAny>, writer: &SharedWriter) -> Result<(), Failure> {
    if let Ok(list) = result.cast::<PyList>() {
        if let Some(joined) = small_body(list.iter())? {
            return finish_whole(writer, &joined);
        }
    } else if let Ok(tuple) = result.cast::<PyTuple>() {
        if let Some(joined) = small_body(tuple.iter())? {
            return finish_whole(writer, &joined);
        }
    }
    for chunk in result.try_iter()? {
        let chunk = chunk?;
        let bytes = body_bytes(&chunk)?;
        let mut w = writer.borrow_mut();
        if !w.started() && !bytes.as_bytes().is_empty() {
            return Err(not_started());
        }
        w.write(bytes.as_bytes())?;
    }
    let mut w = writer.borrow_mut();
    if !w.started() {
        return Err(not_started());
    }
    Ok(w.finish()?)
}

fn not_started() -> Failure {
    Failure::App(PyRuntimeError::new_err(
        "the application produced a body without calling start_response first",
    ))
}

/// The concatenated body of a small list or tuple of bytes; `None` when it must stream.
fn small_body<'py>(
    items: impl ExactSizeIterator<Item = Bound<'py, PyAny>>,
) -> PyResult<Option<Vec<u8>>> {
    let mut body = Vec::new();
    for item in items {
        let bytes = body_bytes(&item)?;
        if body.len() + bytes.as_bytes().len() > COALESCE_LIMIT {
            return Ok(None);
        }
        body.extend_from_slice(bytes.as_bytes());
    }
    Ok(Some(body))
}

fn finish_whole(writer: &SharedWriter, body: &[u8]) -> Result<(), Failure> {
    let mut w = writer.borrow_mut();
    if !w.started() {
        return Err(not_started());
    }
    Ok(w.write_all_and_finish(body)?)
}

/// The full traceback of a Python exception, for the log.
pub fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        tb.call_method1(
            "format_exception",
            (err.get_type(py), err.value(py), err.traceback(py)),
        )?
        .extract::<Vec<String>>()
    });
    match formatted {
        Ok(lines) => lines.concat().trim_end().to_string(),
        Err(_) => err.to_string(),
    }
}
