"""devserver-reaper: bulk, safe, resumable deletion of ModelArts DevServer jobs."""

__version__ = "0.1.0"
