"""EDJ, the Event Delivery Junction."""
