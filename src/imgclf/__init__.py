"""imgclf: CIFAR/MNIST image classification that reproduces whole results tables."""
__version__ = "0.1.0"
