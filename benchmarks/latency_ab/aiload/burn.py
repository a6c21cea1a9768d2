# a stand-in for the AI's CPU outside the server: ~12 ms of numpy/cv2 work every 33.3 ms, in its own process
import time, numpy as np, cv2, sys
cv2.setNumThreads(1)
busy = float(sys.argv[1]) / 1000
img = np.random.randint(0, 255, (450, 450, 3), np.uint8)
nxt = time.monotonic()
while True:
    t0 = time.monotonic()
    while time.monotonic() - t0 < busy:
        g = cv2.GaussianBlur(img, (5, 5), 0); m = (g.astype(np.float32) * 0.5).sum()
    nxt += 1 / 30
    d = nxt - time.monotonic()
    if d > 0: time.sleep(d)
    else: nxt = time.monotonic()
