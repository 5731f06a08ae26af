"""catdog: a plain library for image-folder classification (data, models, training, evaluation).

Nothing here imports Prefect; `tasks/` and `flows/` wrap these functions into a pipeline.
"""

import os

# Set before any TensorFlow import, which always comes after this package's: TensorFlow's
# C++ INFO/WARNING lines (oneDNN, CPU feature notices) drown the pipeline's own progress.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
