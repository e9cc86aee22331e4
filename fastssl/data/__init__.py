"""Datasets on disk: the ImageFolder index every backend reads, and the embedded synthetic dataset."""

from fastssl.data.imagefolder import (IMAGE_EXTENSIONS, ImageFolderIndex, check_images, load_rgb,
                                      scan_image_folder)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderIndex", "check_images", "load_rgb", "scan_image_folder"]
