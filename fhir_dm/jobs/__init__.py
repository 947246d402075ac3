"""Event-driven re-assessment: a job queue (Huey) whose tasks call the write-back."""
