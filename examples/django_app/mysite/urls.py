from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("info", views.info),
    path("upload", views.upload),
    path("body", views.body),
    path("stream", views.stream),
]
