"""Building blocks shared by the models, in pure keras.ops."""
