"""DynamicID's own modules: SAA, the face-encoder projection, IMR, the keypoint encoder."""
