"""Face crops from videos, the optional video extra (pip install -r video/requirements.txt).

  extract.py            videos (FaceForensics++, Celeb-DF v2, any real/fake tree) -> the face-crop
                        folders train.py reads: python -m video.extract VIDEOS OUT
  compare_detectors.py  dlib's HOG against OpenCV's Haar cascade on real photographs:
                        python -m video.compare_detectors

predict.py scores videos through extract.video_faces; OpenCV and dlib are imported only when a
video is read.
"""
