"""Quiet TensorFlow start-up: import this before TensorFlow or Keras."""

import os

# C++ INFO/WARNING lines (oneDNN, CPU feature notices) drown the pipeline's own progress.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
