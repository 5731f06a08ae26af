"""catdog: a plain library for image-folder classification (data, models, training, evaluation).

Nothing here imports Prefect; `tasks/` and `flows/` wrap these functions into a pipeline.
"""

__version__ = "0.1.0"
