lib() { echo lib; }
