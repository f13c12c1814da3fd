// Plugin versions for the whole build. AGP 8.9.0 is the version ExecuTorch's own Android build
// uses (extension/android/build.gradle); Kotlin 2.4.20 is the compiler the checks here run
// (npm kotlin-compiler, tools/android_toolchain.py).
plugins {
    id("com.android.application") version "8.9.0" apply false
    id("org.jetbrains.kotlin.android") version "2.4.20" apply false
    id("org.jetbrains.kotlin.jvm") version "2.4.20" apply false
}
