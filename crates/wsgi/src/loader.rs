//! Starting the embedded interpreter and finding the app.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCFunction;

/// Initialises CPython. With a virtualenv, the interpreter is told that its executable is
/// the venv's python, so `sys.prefix`, `pyvenv.cfg` and `.pth` files behave exactly as when
/// that python runs. Python installs no signal handlers: the worker handles signals.
pub fn init_python(virtualenv: Option<&Path>) -> anyhow::Result<()> {
    // SAFETY: called once, first thing in a worker, before any other Python API; the
    // config struct lives on this stack frame until it is cleared.
    unsafe {
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let mut config = config.assume_init();
        config.install_signal_handlers = 0;
        // Keep the app's environment as the operator made it (PYTHONPATH etc. still apply).
        config.parse_argv = 0;
        if let Some(venv) = virtualenv {
            let python = venv.join("bin").join("python");
            if !python.exists() {
                bail!("virtualenv {}: no bin/python in it", venv.display());
            }
            let path = CString::new(python.as_os_str().as_bytes())?;
            let status =
                ffi::PyConfig_SetBytesString(&mut config, &mut config.executable, path.as_ptr());
            if ffi::PyStatus_Exception(status) != 0 {
                ffi::PyConfig_Clear(&mut config);
                bail!("cannot use virtualenv {}", venv.display());
            }
        }
        let status = ffi::Py_InitializeFromConfig(&config);
        ffi::PyConfig_Clear(&mut config);
        if ffi::PyStatus_Exception(status) != 0 {
            bail!("the Python interpreter failed to start");
        }
        // Release the GIL taken by initialisation; `Python::attach` takes it back.
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

/// Imports the app: `--wsgi-app`, else auto-detection in `<app_path>/app` (loader.py).
pub fn load_app(
    py: Python<'_>,
    app_path: &Path,
    wsgi_app: Option<&str>,
    django: bool,
) -> anyhow::Result<Py<PyAny>> {
    let code = CString::new(include_str!("loader.py"))?;
    let result = (|| -> PyResult<Py<PyAny>> {
        let module = PyModule::from_code(py, &code, c"wsgid_loader.py", c"wsgid_loader")?;
        let log = PyCFunction::new_closure(py, None, None, |args, _| -> PyResult<()> {
            let message: String = args.get_item(0)?.extract()?;
            tracing::info!("{message}");
            Ok(())
        })?;
        let app = module
            .getattr("load")?
            .call1((app_path, wsgi_app, django, log))?;
        Ok(app.unbind())
    })();
    result
        .map_err(|e| {
            let loader_error = py
                .import("wsgid_loader")
                .and_then(|m| m.getattr("LoaderError"))
                .is_ok_and(|cls| e.get_type(py).is(&cls));
            if loader_error {
                anyhow!("{}", e.value(py))
            } else {
                anyhow!(
                    "the app failed to import:\n{}",
                    crate::call::format_exception(py, &e)
                )
            }
        })
        .context("cannot load the WSGI app")
}
