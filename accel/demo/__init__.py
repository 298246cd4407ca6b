"""The Gradio side-by-side demo: baseline vs accelerated (``accel-demo``; ``accel.demo.build_demo(...)`` builds the
app)."""

from .app import build_demo

__all__ = ["build_demo"]
