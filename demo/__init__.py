"""The Gradio side-by-side demo (baseline vs accelerated). Nothing is implemented here yet; the demo issue fills
this package."""
