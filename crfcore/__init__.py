"""crfcore: the library behind the MobileNetV2-CRF whole-slide pipeline scripts."""

__version__ = "0.1.0"
