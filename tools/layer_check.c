// layer_check: the whole of one layer's library linked with only the layers below it (CMakeLists.txt,
// layer_check_<layer>). It runs nothing: it exists so that the link fails when a layer calls up.
int main(void) { return 0; }
