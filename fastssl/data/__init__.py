"""Datasets on disk: the ImageFolder index every backend reads, and the embedded synthetic dataset."""

from fastssl.data.imagefolder import (IMAGE_EXTENSIONS, ImageFolderIndex, check_images, load_rgb,
                                      scan_image_folder)
from fastssl.data.synthetic import FAMILY_NAMES, SyntheticSummary, make_synthetic_dataset

__all__ = ["FAMILY_NAMES", "IMAGE_EXTENSIONS", "ImageFolderIndex", "SyntheticSummary", "check_images", "load_rgb",
           "make_synthetic_dataset", "scan_image_folder"]
