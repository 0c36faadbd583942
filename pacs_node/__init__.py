"""The Deep Pneumonia DICOM node: receives chest X-rays, returns SR and SC results."""
