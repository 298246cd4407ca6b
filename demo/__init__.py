"""The Gradio side-by-side demo: baseline vs accelerated (``accel-demo``; ``demo.build_demo(...)`` builds the app)."""

from .app import build_demo

__all__ = ["build_demo"]
