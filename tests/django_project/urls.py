"""The test project's one URL: a page whose body is computed through the cache."""

from __future__ import annotations

from django.urls import path

from django_project import views

urlpatterns = [path("report/<str:name>", views.report)]
