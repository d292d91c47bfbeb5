"""Lightning callbacks shared by every objective: online kNN monitor, pictures, run summary."""
