//! Small objects the environ hands to the app: `wsgi.errors` and `wsgi.file_wrapper`.

use pyo3::prelude::*;

/// `wsgi.errors`: text the app writes here goes to wsgid's log, a line at a time.
#[pyclass(module = "wsgid", unsendable)]
#[derive(Default)]
pub struct Errors {
    pending: String,
}

#[pymethods]
impl Errors {
    fn write(&mut self, text: &str) -> usize {
        self.pending.push_str(text);
        while let Some(newline) = self.pending.find('\n') {
            tracing::warn!(target: "wsgid::app", "{}", &self.pending[..newline]);
            self.pending.drain(..=newline);
        }
        text.len()
    }

    fn writelines(&mut self, lines: Vec<String>) {
        for line in lines {
            self.write(&line);
        }
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            tracing::warn!(target: "wsgid::app", "{}", self.pending);
            self.pending.clear();
        }
    }
}

/// `wsgi.file_wrapper(filelike, block_size=8192)`: iterates `filelike.read(block_size)`.
/// Blocks are at least 64 KiB: mongrel2 disconnects a client with more than 16 messages
/// queued for it, so many small messages hurt where a few large ones do not.
#[pyclass(module = "wsgid")]
pub struct FileWrapper {
    filelike: Py<PyAny>,
    block_size: usize,
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, block_size = 8192))]
    fn new(filelike: Py<PyAny>, block_size: usize) -> Self {
        FileWrapper {
            filelike,
            block_size: block_size.max(64 * 1024),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let block = self
            .filelike
            .bind(py)
            .call_method1("read", (self.block_size,))?;
        Ok((block.len()? > 0).then(|| block.unbind()))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let filelike = self.filelike.bind(py);
        if filelike.hasattr("close")? {
            filelike.call_method0("close")?;
        }
        Ok(())
    }
}
