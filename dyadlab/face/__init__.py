"""Face detection, 68-point landmarks, tracking and head pose (dlib + OpenCV).

Shared by the extractor (video analysis) and synth (training-data crops); it
imports no service.
"""
