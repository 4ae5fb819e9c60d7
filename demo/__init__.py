"""The browser demo (``python demo/app.py``): see demo/app.py."""
