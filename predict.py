"""Top-k labels of images: ``python predict.py model=<deploy folder> inputs=<images>``."""

from repnet.cli import predict

if __name__ == "__main__":
    predict()
