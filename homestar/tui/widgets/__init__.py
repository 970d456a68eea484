"""The app's own widgets: each draws one thing from plain data and knows nothing of processes."""
