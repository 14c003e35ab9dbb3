"""Export scikit-learn's 8x8 digits to MNIST-format IDX files next to this script.

Usage: python3 export_digits.py   (needs scikit-learn; output is byte-for-byte reproducible)
"""
import os
import struct

import numpy as np
from sklearn.datasets import load_digits

out = os.path.dirname(os.path.abspath(__file__))
d = load_digits()
images = d.images.astype(np.uint8)  # [1797, 8, 8], integer values 0..16
labels = d.target.astype(np.uint8)  # [1797], 0..9
assert (d.images == images).all() and (d.target == labels).all()
n, h, w = images.shape
with open(os.path.join(out, "digits-images.idx3-ubyte"), "wb") as f:
    f.write(struct.pack(">IIII", 0x00000803, n, h, w))
    f.write(images.tobytes(order="C"))
with open(os.path.join(out, "digits-labels.idx1-ubyte"), "wb") as f:
    f.write(struct.pack(">II", 0x00000801, n))
    f.write(labels.tobytes())
