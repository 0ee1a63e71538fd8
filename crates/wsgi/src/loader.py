"""How wsgid finds the WSGI callable (runs inside each worker).

Kept in Python because it is Python's import machinery that does the work; the Rust side
calls `load()` once per worker and gets the callable back.
"""
import importlib
import json
import os
import sys


class LoaderError(Exception):
    """No loader could produce a WSGI callable; the message says what was looked for."""


def import_object(name):
    """`pkg.module:callable` (attribute path after the colon) or dotted `pkg.module.callable`."""
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
    else:
        module_name, _, attr_path = name.rpartition(".")
    if not module_name or not attr_path:
        raise LoaderError(
            f"--wsgi-app {name!r}: expected pkg.module:callable or pkg.module.callable")
    obj = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise LoaderError(f"--wsgi-app {name!r}: module {module_name!r} has no {attr_path!r}") from None
    if not callable(obj):
        raise LoaderError(f"--wsgi-app {name!r} is not callable")
    return obj


def django_project(app_dir):
    """Where the Django project is: `(base, package)`, base being the directory to import
    from and package the one holding __init__.py and settings.py (or a settings/ package).
    The package is looked for in app/ itself, then in a directory of app/ holding manage.py:
    `django-admin startproject mysite` makes mysite/manage.py and mysite/mysite/settings.py,
    and that directory copied into app/ as it is must work."""
    def packages(base):
        try:
            entries = sorted(e for e in os.listdir(base) if not e.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            project = os.path.join(base, entry)
            if not os.path.isfile(os.path.join(project, "__init__.py")):
                continue
            if os.path.isfile(os.path.join(project, "settings.py")) or os.path.isfile(
                    os.path.join(project, "settings", "__init__.py")):
                yield entry

    for entry in packages(app_dir):
        return app_dir, entry
    try:
        entries = sorted(e for e in os.listdir(app_dir) if not e.startswith("."))
    except FileNotFoundError:
        return None
    for entry in entries:
        base = os.path.join(app_dir, entry)
        if os.path.isfile(os.path.join(base, "manage.py")):
            for package in packages(base):
                return base, package
    return None


def merge_django_json(settings, path, log):
    """The original's rules: dicts update, lists extend, tuples concatenate, else replace."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            extra = json.load(f)
    except ValueError as e:
        log(f"ignoring {path}: {e}")
        return
    for key, value in extra.items():
        current = getattr(settings, key, None)
        if isinstance(value, dict) and isinstance(current, dict) and current:
            current.update(value)
        elif isinstance(value, list) and isinstance(current, list) and current:
            current.extend(value)
        elif isinstance(value, list) and isinstance(current, tuple) and current:
            setattr(settings, key, current + tuple(value))
        else:
            setattr(settings, key, value)


def load_django(app_path, base, project, log):
    os.environ["DJANGO_SETTINGS_MODULE"] = f"{project}.settings"
    for path in (base, os.path.join(base, project)):
        if path not in sys.path:
            sys.path.insert(0, path)
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    merge_django_json(settings, os.path.join(app_path, "django.json"), log)
    return get_wsgi_application()


def load(app_path, wsgi_app, force_django, log):
    """Returns the WSGI callable for the app folder `app_path`."""
    app_dir = os.path.join(app_path, "app")
    for path in (app_dir, app_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    if wsgi_app:
        return import_object(wsgi_app)
    found = django_project(app_dir)
    if found:
        base, project = found
        log(f"using the Django loader: project {project!r} in {base}")
        return load_django(app_path, base, project, log)
    if force_django:
        raise LoaderError(
            f"--django given, but no Django project in {app_dir} "
            "(a directory with __init__.py and settings.py or settings/)")
    if os.path.isfile(os.path.join(app_dir, "pyroutes_settings.py")):
        import pyroutes  # noqa: F401: the pyroutes loader of the original
        return pyroutes.application
    raise LoaderError(
        f"no WSGI app found: give --wsgi-app pkg.module:callable, or put a Django project "
        f"(a directory with __init__.py and settings.py) in {app_dir}")
