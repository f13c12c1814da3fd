// MiniCPM-V edge: the Android app. Open this directory (apps/android) in Android Studio.
// :app is the Activity + the ExecuTorch adapter; :core is the pure-Kotlin core (image decode
// helpers, EXIF, slicing, prompt segments, device report), unit-tested on the JVM.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "minicpmv-edge"
include(":app", ":core")
