"""Flower's PyTorch quickstart as Flower 1.4x writes it (a Message-API ClientApp and a ServerApp), on MNIST
from flock's reader. See task.py."""
