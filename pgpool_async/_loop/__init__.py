"""Code that runs on the event loop thread only."""
