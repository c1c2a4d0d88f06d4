// Anchors a precompiled header target; intentionally empty.
