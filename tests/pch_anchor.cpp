// Anchors the test precompiled header; intentionally empty.
