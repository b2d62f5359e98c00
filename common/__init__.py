"""What the producer and the workers share. Nothing here imports Celery task code."""
