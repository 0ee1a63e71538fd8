"""An app whose import kills the process (as a crash in a C extension would): no worker
ever becomes ready, and the master must not retry forever."""
import os

os.abort()
