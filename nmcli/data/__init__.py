"""Where training, calibration and evaluation examples come from: images, text, teacher-written text."""
