#include <stdio.h>
int main(void)
{
	fputs("vqcowd: not built yet\n", stderr);
	return 1;
}
