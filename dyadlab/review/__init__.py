"""Reviewing dyadlab output against human coding: agreement measures for methods sections."""
