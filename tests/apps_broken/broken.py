"""An app that fails to import: the master must back off, not spin."""
raise ImportError("this app is broken on purpose")
