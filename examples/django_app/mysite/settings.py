"""Minimal Django settings for the wsgid example and tests (no database)."""
SECRET_KEY = "wsgid-example-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES = {}
USE_TZ = True
# Files above this size are streamed to a temp file by Django's multipart parser.
FILE_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
