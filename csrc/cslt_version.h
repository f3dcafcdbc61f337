// SR_CSLT_MAJOR/MINOR/PATCH and SR_CSLT_AT_LEAST(major, minor, patch) from cusparseLt.h's version macros.
//
// CUSPARSELT_VERSION was MAJOR*1000 + MINOR*100 + PATCH up to 0.8 and is MAJOR*1000000 + MINOR*100 + PATCH
// since (minor may be a 4-digit stamp). Every release under the old encoding was 0.x, so a value below
// 1000000 is always 0.MINOR.PATCH (0.8.2 -> 802, 0.10.0 -> 1000), whichever encoding wrote it. The
// component macros win when present.
#pragma once

#if defined(CUSPARSELT_VER_MAJOR) && defined(CUSPARSELT_VER_MINOR) && defined(CUSPARSELT_VER_PATCH)
#define SR_CSLT_MAJOR CUSPARSELT_VER_MAJOR
#define SR_CSLT_MINOR CUSPARSELT_VER_MINOR
#define SR_CSLT_PATCH CUSPARSELT_VER_PATCH
#elif defined(CUSPARSELT_VERSION)
#define SR_CSLT_MAJOR (CUSPARSELT_VERSION / 1000000)
#define SR_CSLT_MINOR ((CUSPARSELT_VERSION / 100) % 10000)
#define SR_CSLT_PATCH (CUSPARSELT_VERSION % 100)
#else
#error "cusparseLt.h defines no version macros"
#endif

#define SR_CSLT_AT_LEAST(maj, min, patch)                                 \
  (SR_CSLT_MAJOR != (maj) ? SR_CSLT_MAJOR > (maj)                         \
                          : SR_CSLT_MINOR != (min) ? SR_CSLT_MINOR > (min) \
                                                   : SR_CSLT_PATCH >= (patch))
