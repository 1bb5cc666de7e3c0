# Docker targets (filled in by the deployment work).
