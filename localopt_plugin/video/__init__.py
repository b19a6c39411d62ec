"""Video files: mp4 (PyAV), GIF and frame-grid PNG (Pillow)."""
